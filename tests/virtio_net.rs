//! End-to-end tests of kite's virtio-net device over a TAP, with the Linux
//! test guest's own virtio-net driver and busybox (`ip`, `ping`, `nc`,
//! `httpd`) as its clients.
//!
//! Every test makes a network namespace of its own (`kite-test-<pid>-<n>`,
//! deleted when the test ends, also on a panic) and runs kite inside it with
//! `ip netns exec`, so the TAP kite creates lives there; only addresses in
//! 10.200.<test>.0/24 inside that namespace are used. The host side of each
//! exchange (TCP servers and clients, ICMP echo) is this test process: a
//! thread that joined the namespace (`setns`) opens the sockets, which then
//! stay in that namespace whichever thread uses them. No host tools beyond
//! `ip` (iproute2) and `sha256sum` are needed.
//!
//! `small_rings_carry_segmentation_offload_traffic` fails while kite waits
//! forever for receive buffers the Linux driver never posts (see there).
//!
//! The guest runs a shell script from a read-only script disk (`/dev/vda`,
//! `kite.exec=vda`) and prints `KITE-*` marker lines on the serial console
//! (a file here), which the host waits for to coordinate.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;
use serde_json::{json, Value};

/// Per-step timeout; generous because CI machines may be loaded.
const TIMEOUT: Duration = Duration::from_secs(30);

const MIB: usize = 1 << 20;

/// Ends every script: a last marker, then `stty` (TCSETSW waits until the
/// console has sent everything) so no line is cut by the power-off.
const SCRIPT_END: &str = "echo KITE-SCRIPT-END\n$B stty onlcr\n$B poweroff -f\n";

/// The largest Ethernet frame without segmentation offload: a 1500-byte
/// MTU plus the 14-byte Ethernet header.
const MAX_PLAIN_FRAME: u64 = 1514;

/// The host (TAP) side address of test `n`'s subnet.
fn host_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, n, 1)
}

/// The guest's address in test `n`'s subnet.
fn guest_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, n, 2)
}

/// `--net` for a TAP `kt0` that kite creates with `host_ip(n)/24`, plus
/// `extra` options (each starting with a comma).
fn net_arg(n: u8, extra: &str) -> String {
    format!("tap=kt0,ip={},mask=255.255.255.0{extra}", host_ip(n))
}

// ---------------------------------------------------------------------------
// Guest side
// ---------------------------------------------------------------------------

/// Shell: gives eth0 `guest_ip(n)/24` and brings it up.
fn guest_up(n: u8) -> String {
    format!(
        "$B ip addr add {}/24 dev eth0 || echo KITE-NET-SETUP-FAILED\n\
         $B ip link set eth0 up || echo KITE-NET-SETUP-FAILED\n",
        guest_ip(n)
    )
}

/// Shell: `count` pings of `size` data bytes to `to`; prints
/// `KITE-PING-<tag>: <rc> <busybox's summary line>`.
fn guest_ping(tag: &str, to: Ipv4Addr, count: u32, size: u32) -> String {
    format!(
        "$B ping -c {count} -s {size} -i 0.2 -W 5 {to} > /tmp/ping 2>&1\n\
         echo \"KITE-PING-{tag}: $? $($B grep 'packets transmitted' /tmp/ping)\"\n"
    )
}

/// Checks a [`guest_ping`] line: all `count` replies came back.
#[track_caller]
fn assert_guest_ping(out: &str, tag: &str, count: u32) {
    assert_eq!(
        expect_field(out, &format!("KITE-PING-{tag}: ")),
        format!("0 {count} packets transmitted, {count} packets received, 0% packet loss"),
        "guest ping {tag}:\n{out}"
    );
}

/// The guest's command line with `kite.exec=vda`.
fn exec_cmdline() -> String {
    format!("{} kite.exec=vda", linux_guest().cmdline)
}

/// Fails if the guest could not configure eth0.
#[track_caller]
fn assert_setup_ok(out: &str) {
    assert!(
        !out.contains("KITE-NET-SETUP-FAILED"),
        "the guest could not configure eth0:\n{out}"
    );
}

// ---------------------------------------------------------------------------
// A VM booted in the background (CLI)
// ---------------------------------------------------------------------------

/// kite running the Linux guest with a script, inside a namespace, serial
/// console to a file; killed when dropped.
struct NetVm {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
}

impl NetVm {
    /// Boots `script` (then [`SCRIPT_END`]) with `cpus` vCPUs and one `--net`
    /// per entry of `nets`.
    fn boot(ns: &NetNs, dir: &TempDir, script: &str, cpus: u32, nets: &[String]) -> NetVm {
        NetVm::boot_with(ns, dir, script, cpus, nets, |_| {})
    }

    /// Like [`NetVm::boot`]; `adjust` may change the command before it runs.
    fn boot_with(
        ns: &NetNs,
        dir: &TempDir,
        script: &str,
        cpus: u32,
        nets: &[String],
        adjust: impl FnOnce(&mut Command),
    ) -> NetVm {
        let guest = linux_guest();
        let disk = script_disk(dir, &format!("{script}\n{SCRIPT_END}"));
        let serial = dir.path("serial.txt");
        let stderr = dir.path("kite.stderr");
        let _ = fs::remove_file(&serial);
        let mut cmd = ns.command(kite_bin());
        cmd.arg("--kernel")
            .arg(&guest.vmlinux)
            .arg("--initramfs")
            .arg(&guest.initramfs)
            .args(["--cmdline", &exec_cmdline()])
            .args(["--cpus", &format!("boot={cpus}")])
            .args(["--memory", "size=256M"])
            .arg("--disk")
            .arg(format!("path={},readonly=on", disk.display()))
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(["--console", "off"]);
        for net in nets {
            cmd.args(["--net", net]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap());
        adjust(&mut cmd);
        let child = cmd.spawn().unwrap();
        NetVm {
            child,
            serial,
            stderr,
        }
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        format!(
            "serial:\n{}\nkite's stderr:\n{}",
            self.output(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for the line `marker` on the console; returns the output.
    #[track_caller]
    fn wait_for(&mut self, marker: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.output();
            if count_lines(&out, marker) > 0 {
                return out;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kite exited ({status}) before the guest printed {marker:?}\n{}",
                    self.diagnostics()
                );
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "no {marker:?} after {TIMEOUT:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for kite to exit after the script's end; it must succeed.
    /// Returns the console output.
    #[track_caller]
    fn finish(mut self) -> String {
        let status = wait_child(&mut self.child, TIMEOUT);
        let out = self.output();
        match status {
            Some(s) => assert!(s.success(), "kite exited with {s}\n{}", self.diagnostics()),
            None => panic!(
                "kite did not exit within {TIMEOUT:?}\n{}",
                self.diagnostics()
            ),
        }
        assert_eq!(
            count_lines(&out, "KITE-SCRIPT-END"),
            1,
            "the guest script did not run to its end\n{}",
            self.diagnostics()
        );
        out
    }
}

impl Drop for NetVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Host side: TCP and ICMP inside the namespace
// ---------------------------------------------------------------------------

/// A TCP listener on `0.0.0.0:port` in the namespace (0.0.0.0: the TAP and
/// its address do not exist before kite runs).
fn listen(ns: &NetNs, port: u16) -> TcpListener {
    ns.enter(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
}

/// Accepts one connection within [`TIMEOUT`].
fn accept(listener: &TcpListener) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.set_write_timeout(Some(TIMEOUT)).unwrap();
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > TIMEOUT {
                    return Err(format!("no connection within {TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Serves `data` to the first client, then closes.
fn serve(listener: TcpListener, data: Arc<Vec<u8>>) -> JoinHandle<Result<(), String>> {
    serve_each(listener, vec![data])
}

/// Serves `replies[i]` to the i-th client, closing each connection after.
fn serve_each(listener: TcpListener, replies: Vec<Arc<Vec<u8>>>) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        for (i, data) in replies.iter().enumerate() {
            let mut s = accept(&listener).map_err(|e| format!("client {i}: {e}"))?;
            s.write_all(data)
                .map_err(|e| format!("send to client {i}: {e}"))?;
        }
        Ok(())
    })
}

/// Receives everything the first client sends until it closes.
fn receive(listener: TcpListener) -> JoinHandle<Result<Vec<u8>, String>> {
    std::thread::spawn(move || {
        let mut s = accept(&listener)?;
        let mut v = Vec::new();
        s.read_to_end(&mut v)
            .map_err(|e| format!("receive (after {} bytes): {e}", v.len()))?;
        Ok(v)
    })
}

/// Joins a server thread; fails the test with its error.
#[track_caller]
fn join<T>(what: &str, handle: JoinHandle<Result<T, String>>) -> T {
    match handle.join() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("host side of {what}: {e}"),
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Connects from the namespace to `to:port`, retrying while the guest does
/// not listen yet, and sends `data`.
fn send_to_guest(ns: &NetNs, to: Ipv4Addr, port: u16, data: Vec<u8>) {
    let result = ns.enter(move || -> Result<(), String> {
        let start = Instant::now();
        let addr = SocketAddr::from((to, port));
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(mut s) => {
                    s.set_write_timeout(Some(TIMEOUT)).unwrap();
                    return s.write_all(&data).map_err(|e| format!("send: {e}"));
                }
                Err(e) if start.elapsed() > TIMEOUT => {
                    return Err(format!("connect to {addr}: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    result.unwrap_or_else(|e| panic!("host to guest TCP: {e}"));
}

/// The Internet checksum.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests with `size` data bytes from the
/// namespace to `to` (a raw socket; one at a time, each waited for up to
/// 3 s) and returns how many matching replies (same id, sequence and
/// data) came back.
fn host_ping(ns: &NetNs, to: Ipv4Addr, count: u16, size: usize) -> u16 {
    ns.enter(move || {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just opened and is owned only here.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval, which is passed with its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: all-zero is a valid sockaddr_in.
        let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dst.sin_family = libc::AF_INET as libc::sa_family_t;
        dst.sin_addr.s_addr = u32::from(to).to_be();
        let id = (std::process::id() as u16) ^ 0x4b54;
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let mut replies = 0;
        for seq in 0..count {
            let mut packet = vec![8u8, 0, 0, 0];
            packet.extend_from_slice(&id.to_be_bytes());
            packet.extend_from_slice(&seq.to_be_bytes());
            packet.extend_from_slice(&payload);
            let sum = inet_checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
            // SAFETY: packet and dst are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    packet.as_ptr() as *const libc::c_void,
                    packet.len(),
                    0,
                    &dst as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                sent,
                packet.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
            let start = Instant::now();
            let mut buf = vec![0u8; 65536];
            while start.elapsed() < Duration::from_secs(3) {
                // SAFETY: buf is valid for its length.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                    )
                };
                if n < 20 {
                    continue;
                }
                let ip = &buf[..n as usize];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
                let icmp = &ip[ihl.min(ip.len())..];
                if src == to
                    && icmp.len() == 8 + size
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                    && icmp[8..] == payload[..]
                {
                    replies += 1;
                    break;
                }
            }
        }
        replies
    })
}

// ---------------------------------------------------------------------------
// Data and checksums
// ---------------------------------------------------------------------------

/// The host's sha256 (by `sha256sum`) of `data`.
fn sha256(dir: &TempDir, data: &[u8]) -> String {
    let path = dir.path("sha-input");
    fs::write(&path, data).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(out.status.success(), "sha256sum");
    fs::remove_file(&path).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Asserts two byte strings are equal; on a difference says where.
#[track_caller]
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: got {} bytes, expected {}; first difference at byte {first}",
        actual.len(),
        expected.len()
    );
}

// ---------------------------------------------------------------------------
// 1: ping both ways
// ---------------------------------------------------------------------------

#[test]
fn ping_both_ways() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-ping");
    let n = 1;
    let script = format!(
        "{}{}echo KITE-NET-READY\n\
         echo \"KITE-HOST-SAID: $($B nc -l -p 7000)\"\n",
        guest_up(n),
        guest_ping("GUEST", host_ip(n), 3, 56),
    );
    let mut vm = NetVm::boot(&ns, &dir, &script, 1, &[net_arg(n, "")]);
    let out = vm.wait_for("KITE-NET-READY");
    assert_setup_ok(&out);
    assert_guest_ping(&out, "GUEST", 3);

    // The guest waits in `nc -l`: ping it from the namespace, then tell it
    // to go on over TCP.
    let replies = host_ping(&ns, guest_ip(n), 3, 56);
    let token = format!("kite-host-{}", std::process::id());
    send_to_guest(&ns, guest_ip(n), 7000, format!("{token}\n").into_bytes());
    let out = vm.finish();
    assert_eq!(
        replies, 3,
        "the guest answered {replies} of 3 pings from the host:\n{out}"
    );
    assert_eq!(expect_field(&out, "KITE-HOST-SAID: "), token, "{out}");
}

// ---------------------------------------------------------------------------
// 2: TCP both ways, checksums
// ---------------------------------------------------------------------------

#[test]
fn tcp_transfers_both_ways_arrive_intact() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-tcp");
    let n = 2;
    let size = 4 * MIB;
    let to_guest = Arc::new(noise(size, 21));
    let server = serve(listen(&ns, 5001), to_guest.clone());
    let sink = receive(listen(&ns, 5002));
    let h = host_ip(n);
    let script = format!(
        r#"{}
$B nc {h} 5001 > /tmp/from-host
echo "KITE-RX-RC: $?"
echo "KITE-RX: $($B wc -c < /tmp/from-host) $($B sha256sum /tmp/from-host | $B cut -d' ' -f1)"
$B dd if=/dev/urandom of=/tmp/to-host bs=65536 count={} 2>/dev/null
echo "KITE-TX: $($B wc -c < /tmp/to-host) $($B sha256sum /tmp/to-host | $B cut -d' ' -f1)"
$B nc {h} 5002 < /tmp/to-host
echo "KITE-TX-RC: $?"
"#,
        guest_up(n),
        size / 65536
    );
    let vm = NetVm::boot(&ns, &dir, &script, 1, &[net_arg(n, "")]);
    let out = vm.finish();
    assert_setup_ok(&out);
    join("host to guest", server);
    let from_guest = join("guest to host", sink);

    assert_eq!(expect_field(&out, "KITE-RX-RC: "), "0", "{out}");
    assert_eq!(
        expect_field(&out, "KITE-RX: "),
        format!("{size} {}", sha256(&dir, &to_guest)),
        "what the guest received differs from what the host sent:\n{out}"
    );
    assert_eq!(expect_field(&out, "KITE-TX-RC: "), "0", "{out}");
    assert_eq!(
        expect_field(&out, "KITE-TX: "),
        format!("{} {}", from_guest.len(), sha256(&dir, &from_guest)),
        "what the host received differs from what the guest sent:\n{out}"
    );
    assert_eq!(from_guest.len(), size, "{out}");
}

// ---------------------------------------------------------------------------
// 3: MAC addresses, MTU
// ---------------------------------------------------------------------------

/// Shell: prints eth0's MAC and MTU.
const SHOW_MAC_MTU: &str = "echo \"KITE-MAC: $($B cat /sys/class/net/eth0/address)\"\n\
     echo \"KITE-MTU: $($B cat /sys/class/net/eth0/mtu)\"\n";

#[test]
fn configured_and_random_macs_and_mtu() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-mac");
    let n = 3;

    // The configured MAC, with an MTU of 9000 on both sides.
    let vm = NetVm::boot(
        &ns,
        &dir,
        SHOW_MAC_MTU,
        1,
        &[net_arg(n, ",mac=12:34:56:78:9a:bc,mtu=9000")],
    );
    let out = vm.finish();
    assert_eq!(
        expect_field(&out, "KITE-NET: eth0 "),
        "12:34:56:78:9a:bc",
        "{out}"
    );
    assert_eq!(expect_field(&out, "KITE-MAC: "), "12:34:56:78:9a:bc");
    assert_eq!(expect_field(&out, "KITE-MTU: "), "9000", "{out}");

    // No MAC: a random, unicast, locally administered one, new each time.
    let mut macs = Vec::new();
    for _ in 0..2 {
        let vm = NetVm::boot(&ns, &dir, SHOW_MAC_MTU, 1, &[net_arg(n, "")]);
        let out = vm.finish();
        let mac = expect_field(&out, "KITE-NET: eth0 ").to_string();
        assert_eq!(expect_field(&out, "KITE-MAC: "), mac, "{out}");
        assert_eq!(expect_field(&out, "KITE-MTU: "), "1500", "{out}");
        let octets: Vec<u8> = mac
            .split(':')
            .map(|o| u8::from_str_radix(o, 16).unwrap())
            .collect();
        assert_eq!(octets.len(), 6, "{mac}");
        assert_eq!(octets[0] & 1, 0, "random MAC {mac} is multicast");
        assert_eq!(
            octets[0] & 2,
            2,
            "random MAC {mac} is not locally administered"
        );
        assert!(
            octets[1..].iter().any(|&o| o != 0),
            "random MAC {mac} is mostly zeros"
        );
        macs.push(mac);
    }
    assert_ne!(macs[0], macs[1], "two boots got the same random MAC");
    // The TAPs kite created went with their VMs.
    assert_eq!(ns.links(), ["lo"], "interfaces left in the namespace");
}

// ---------------------------------------------------------------------------
// 4: two queue pairs with two vCPUs
// ---------------------------------------------------------------------------

#[test]
fn two_queue_pairs_with_two_vcpus() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-mq");
    let n = 4;
    let size = 2 * MIB;
    let data: Vec<Arc<Vec<u8>>> = (0..2).map(|q| Arc::new(noise(size, 40 + q))).collect();
    let servers: Vec<_> = (0..2u16)
        .map(|q| serve(listen(&ns, 5010 + q), data[q as usize].clone()))
        .collect();
    let sinks: Vec<_> = (0..2u16).map(|q| receive(listen(&ns, 5020 + q))).collect();
    let h = host_ip(n);
    // One flow per vCPU each way: the guest driver transmits on its CPU's
    // queue; the TAP answers a flow on the queue it last came from. Each
    // flow echoes back what it received.
    let script = format!(
        r#"{}
echo "KITE-QUEUES: $($B ls /sys/class/net/eth0/queues | $B tr '\n' ' ')"
echo "KITE-VIRTIO: $($B basename $($B readlink /sys/class/net/eth0/device))"
$B taskset 1 $B nc {h} 5010 > /tmp/r0 &
$B taskset 2 $B nc {h} 5011 > /tmp/r1 &
wait
$B taskset 1 $B nc {h} 5020 < /tmp/r0 &
$B taskset 2 $B nc {h} 5021 < /tmp/r1 &
wait
echo "KITE-SIZES: $($B wc -c < /tmp/r0) $($B wc -c < /tmp/r1)"
$B grep -E 'virtio[0-9]+-' /proc/interrupts | while read l; do echo "KITE-IRQ: $l"; done
"#,
        guest_up(n)
    );
    let vm = NetVm::boot(&ns, &dir, &script, 2, &[net_arg(n, ",num_queues=4")]);
    let out = vm.finish();
    assert_setup_ok(&out);
    for s in servers {
        join("host to guest", s);
    }
    for (q, s) in sinks.into_iter().enumerate() {
        let got = join("guest to host", s);
        assert_same_bytes(&got, &data[q], &format!("flow {q} echoed by the guest"));
    }
    assert_eq!(
        expect_field(&out, "KITE-SIZES: "),
        format!("{size} {size}"),
        "{out}"
    );
    assert_eq!(
        expect_field(&out, "KITE-QUEUES: "),
        "rx-0 rx-1 tx-0 tx-1 ",
        "the guest does not use two queue pairs:\n{out}"
    );
    // One MSI-X vector per data queue, named after it, plus config; the
    // control queue is polled. Both transmit and both receive queues fired.
    let virtio = expect_field(&out, "KITE-VIRTIO: ");
    let irqs: Vec<(String, u64)> = irq_lines(&out)
        .into_iter()
        .filter(|(name, _)| name.starts_with(&format!("{virtio}-")))
        .collect();
    let mut names: Vec<&str> = irqs.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let want: Vec<String> = ["config", "input.0", "input.1", "output.0", "output.1"]
        .iter()
        .map(|q| format!("{virtio}-{q}"))
        .collect();
    assert_eq!(names, want, "interrupt vectors of eth0:\n{out}");
    for (name, count) in &irqs {
        if !name.ends_with("-config") {
            assert!(*count > 0, "no interrupt on {name}:\n{out}");
        }
    }
}

// ---------------------------------------------------------------------------
// 5: large frames, segmentation offload
// ---------------------------------------------------------------------------

/// Guest script for [`large_frames_and_segmentation_offload`]: pings of
/// 1472 (one full frame) and 8000 data bytes (fragments), a host→guest
/// transfer, then an HTTP server (busybox httpd sends with sendfile, in
/// large writes) until the host says it is done.
fn large_frames_script(n: u8, size: usize) -> String {
    let h = host_ip(n);
    format!(
        r#"{}{}{}
$B nc {h} 5001 > /tmp/from-host
echo "KITE-RX: $($B wc -c < /tmp/from-host) $($B sha256sum /tmp/from-host | $B cut -d' ' -f1)"
$B mkdir -p /tmp/www
$B dd if=/dev/urandom of=/tmp/www/blob bs=65536 count={} 2>/dev/null
echo "KITE-BLOB: $($B sha256sum /tmp/www/blob | $B cut -d' ' -f1)"
$B httpd -p 8080 -h /tmp/www
echo KITE-HTTPD-UP
$B nc -l -p 7000 > /dev/null
"#,
        guest_up(n),
        guest_ping("1472", h, 3, 1472),
        guest_ping("8000", h, 3, 8000),
        size / 65536
    )
}

/// Fetches `http://to:8080/<path>` from the namespace; returns the body.
fn http_get(ns: &NetNs, to: Ipv4Addr, path: &str) -> Vec<u8> {
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {to}\r\n\r\n");
    let reply = ns.enter(move || -> Result<Vec<u8>, String> {
        let addr = SocketAddr::from((to, 8080));
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut v = Vec::new();
        s.read_to_end(&mut v).map_err(|e| e.to_string())?;
        Ok(v)
    });
    let reply = reply.unwrap_or_else(|e| panic!("HTTP GET from the guest: {e}"));
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header: {:?}", String::from_utf8_lossy(&reply)));
    let head = String::from_utf8_lossy(&reply[..end]);
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    reply[end + 4..].to_vec()
}

/// Runs [`large_frames_script`] with `--net <net>`; returns the console
/// output and the average size of the frames the TAP carried in each
/// direction during the bulk transfers (to the guest, from the guest).
fn large_frames_run(ns: &NetNs, dir: &TempDir, n: u8, net: String) -> (String, f64, f64) {
    let size = 4 * MIB;
    let to_guest = Arc::new(noise(size, 50));
    let server = serve(listen(ns, 5001), to_guest.clone());
    let mut vm = NetVm::boot(ns, dir, &large_frames_script(n, size), 1, &[net]);
    // The TAP's tx is the guest's rx and the other way round.
    let out = vm.wait_for("KITE-HTTPD-UP");
    assert_setup_ok(&out);
    join("host to guest", server);
    let tap_tx = (ns.stat("kt0", "tx_bytes"), ns.stat("kt0", "tx_packets"));
    let rx_before = (ns.stat("kt0", "rx_bytes"), ns.stat("kt0", "rx_packets"));
    let body = http_get(ns, guest_ip(n), "blob");
    let rx_after = (ns.stat("kt0", "rx_bytes"), ns.stat("kt0", "rx_packets"));
    send_to_guest(ns, guest_ip(n), 7000, b"done\n".to_vec());
    let out = vm.finish();

    for (tag, count) in [("1472", 3), ("8000", 3)] {
        assert_guest_ping(&out, tag, count);
    }
    assert_eq!(
        expect_field(&out, "KITE-RX: "),
        format!("{size} {}", sha256(dir, &to_guest)),
        "what the guest received differs from what the host sent:\n{out}"
    );
    assert_eq!(body.len(), size, "{out}");
    assert_eq!(
        expect_field(&out, "KITE-BLOB: "),
        sha256(dir, &body),
        "what the host fetched differs from the guest's file:\n{out}"
    );
    let avg = |bytes: u64, frames: u64| bytes as f64 / frames.max(1) as f64;
    let to_guest_avg = avg(tap_tx.0, tap_tx.1);
    let from_guest_avg = avg(rx_after.0 - rx_before.0, rx_after.1 - rx_before.1);
    (out, to_guest_avg, from_guest_avg)
}

#[test]
fn large_frames_and_segmentation_offload() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-tso");
    let n = 5;
    // Default offloads: TCP segments larger than a frame pass the device
    // both ways (the TAP counts each as one packet).
    let (out, to_guest, from_guest) = large_frames_run(&ns, &dir, n, net_arg(n, ""));
    assert!(
        to_guest > (2 * MAX_PLAIN_FRAME) as f64,
        "host to guest with TSO: {to_guest:.0} bytes per frame on the TAP; no large segments reached the guest:\n{out}"
    );
    assert!(
        from_guest > (2 * MAX_PLAIN_FRAME) as f64,
        "guest to host with TSO: {from_guest:.0} bytes per frame on the TAP; the guest sent no large segments:\n{out}"
    );

    // Without TSO every frame fits the MTU, and the transfers still work.
    let (out, to_guest, from_guest) =
        large_frames_run(&ns, &dir, n, net_arg(n, ",offload_tso=off"));
    assert!(
        to_guest <= MAX_PLAIN_FRAME as f64,
        "host to guest, offload_tso=off: {to_guest:.0} bytes per frame on the TAP:\n{out}"
    );
    assert!(
        from_guest <= MAX_PLAIN_FRAME as f64,
        "guest to host, offload_tso=off: {from_guest:.0} bytes per frame on the TAP:\n{out}"
    );
}

// ---------------------------------------------------------------------------
// 6: counters and device tree (API)
// ---------------------------------------------------------------------------

/// Starts `kite --api-socket` inside the namespace.
fn start_api_in(ns: &NetNs) -> Kite {
    let dir = TempDir::new("vn-api");
    let socket = dir.path("api.sock");
    let child = ns
        .command(kite_bin())
        .arg("--api-socket")
        .arg(&socket)
        .arg("--log-file")
        .arg(dir.path("kite.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kite = Kite { child, socket, dir };
    let start = Instant::now();
    while !kite.socket.exists() {
        assert!(start.elapsed() < TIMEOUT, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    kite
}

/// A `vm.create` body: the Linux guest running the script disk `disk`,
/// serial to `serial`, with `net`.
fn api_config(serial: &Path, disk: &Path, net: Value) -> Value {
    let guest = linux_guest();
    let mut v: Value = serde_json::from_str(&vm_config(
        &guest.vmlinux,
        Some(&guest.initramfs),
        &exec_cmdline(),
        1,
        256,
        serial,
    ))
    .unwrap();
    v["disks"] = json!([{"path": disk, "readonly": true}]);
    v["net"] = net;
    v
}

#[test]
fn counters_and_device_tree_via_the_api() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-counters");
    let n = 6;
    let size = 2 * MIB;
    let to_guest = Arc::new(noise(size, 60));
    let server = serve(listen(&ns, 5001), to_guest);
    let sink = receive(listen(&ns, 5002));
    let h = host_ip(n);
    // The guest waits for the power button (its event device opened
    // first, so the press cannot be missed) between the phases.
    let script = format!(
        r#"{}
echo "KITE-NET-PCI: $($B basename $($B dirname $($B readlink -f /sys/class/net/eth0/device)))"
echo "KITE-MAC: $($B cat /sys/class/net/eth0/address)"
for d in /sys/bus/pci/devices/*; do echo "KITE-PCI: ${{d##*/}} $($B cat $d/vendor) $($B cat $d/device)"; done
exec 4</dev/input/event0
echo KITE-NET-READY
$B dd bs=24 count=1 <&4 >/dev/null 2>&1
$B nc {h} 5001 > /tmp/data
$B nc {h} 5002 < /tmp/data
echo "KITE-SIZE: $($B wc -c < /tmp/data)"
echo KITE-XFER-DONE
while true; do $B sleep 1; done
"#,
        guest_up(n)
    );
    let disk = script_disk(&dir, &script);
    let kite = start_api_in(&ns);
    let serial = kite.dir.path("serial.txt");
    let net = json!([{"tap": "kt0", "ip": h.to_string(), "mask": "255.255.255.0", "id": "lan0"}]);
    let config = api_config(&serial, &disk, net);
    kite.put_ok("vm.create", Some(&config.to_string()));
    kite.put_ok("vm.boot", None);
    let out = wait_for_file(&serial, "KITE-NET-READY\r\n", TIMEOUT);
    assert_setup_ok(&out);
    let before = kite.counters();
    kite.put_ok("vm.power-button", None);
    let out = wait_for_file(&serial, "KITE-XFER-DONE\r\n", TIMEOUT);
    let after = kite.counters();
    join("host to guest", server);
    let echoed = join("guest to host", sink);
    assert_eq!(expect_field(&out, "KITE-SIZE: "), size.to_string(), "{out}");
    assert_eq!(echoed.len(), size, "{out}");

    for name in [
        "rx_bytes",
        "rx_frames",
        "rx_dropped",
        "tx_bytes",
        "tx_frames",
        "tx_dropped",
    ] {
        counter(&after, "lan0", name);
    }
    let delta = |name: &str| counter(&after, "lan0", name) - counter(&before, "lan0", name);
    let size = size as u64;
    // Payload plus headers (about 4 %) and the other direction's ACKs.
    let (lo, hi) = (size, size + size / 4 + (64 << 10));
    for dir in ["rx", "tx"] {
        let bytes = delta(&format!("{dir}_bytes"));
        assert!(
            (lo..=hi).contains(&bytes),
            "lan0 {dir}_bytes grew by {bytes} for {size} bytes of TCP payload: {before} -> {after}"
        );
        let frames = delta(&format!("{dir}_frames"));
        assert!(
            frames > 0 && frames < bytes / 54,
            "lan0 {dir}_frames grew by {frames}: {before} -> {after}"
        );
        assert_eq!(delta(&format!("{dir}_dropped")), 0, "{before} -> {after}");
    }

    // vm.info: the device in the device tree at the PCI address where the
    // guest found its virtio-net (1af4:1041); the random MAC kept in the
    // config is the guest's.
    let (code, body) = kite.api("GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    let node = &info["device_tree"]["lan0"];
    assert_eq!(node["id"], "lan0", "{body}");
    let bdf = node["pci_bdf"]
        .as_str()
        .unwrap_or_else(|| panic!("lan0 has no pci_bdf: {body}"));
    assert_eq!(expect_field(&out, "KITE-NET-PCI: "), bdf, "{out}\n{body}");
    assert_eq!(
        expect_field(&out, &format!("KITE-PCI: {bdf} ")),
        "0x1af4 0x1041",
        "{out}"
    );
    let nets = info["config"]["net"]
        .as_array()
        .unwrap_or_else(|| panic!("no net in vm.info's config: {body}"));
    assert_eq!(nets.len(), 1, "{body}");
    assert_eq!(
        nets[0]["mac"].as_str(),
        Some(expect_field(&out, "KITE-MAC: ")),
        "{body}\n{out}"
    );
    assert_eq!(nets[0]["tap"], "kt0", "{body}");
    kite.put_ok("vm.shutdown", None);
    kite.wait_state("Shutdown", TIMEOUT);
}

// ---------------------------------------------------------------------------
// 7: TAPs that exist: by name, by file descriptor
// ---------------------------------------------------------------------------

/// Opens `/dev/net/tun` in the namespace and creates the TAP `name` with
/// IFF_NO_PI and IFF_VNET_HDR, as a VMM is handed one; it exists while the
/// descriptor is open.
fn open_tap(ns: &NetNs, name: &str) -> OwnedFd {
    let name = name.to_string();
    ns.enter(move || {
        let tun = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        // struct ifreq: the name (16 bytes), then the flags (a short).
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which ifr
        // is large enough for.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        OwnedFd::from(tun)
    })
}

/// Makes the child of `cmd` inherit `fd` as its descriptor 3 (`ip netns
/// exec` passes it on to kite).
fn pass_fd_as_3(cmd: &mut Command, fd: i32) {
    // SAFETY: between fork and exec only the async-signal-safe dup2 and
    // fcntl run; `fd` stays open in the parent until the child has started.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn existing_taps_by_name_and_by_file_descriptor() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-existing");
    let n = 7;
    let script = format!("{}{}", guest_up(n), guest_ping("GUEST", host_ip(n), 3, 56));
    let host_cidr = format!("{}/24", host_ip(n));

    // A persistent TAP made beforehand: kite attaches to it and leaves its
    // address alone (ip/mask apply only to a TAP kite creates).
    ns.ip(&["tuntap", "add", "dev", "ktname", "mode", "tap"]);
    ns.ip(&["addr", "add", &host_cidr, "dev", "ktname"]);
    ns.ip(&["link", "set", "ktname", "up"]);
    let vm = NetVm::boot(
        &ns,
        &dir,
        &script,
        1,
        &["tap=ktname,ip=10.200.77.1,mask=255.255.255.0".into()],
    );
    let out = vm.finish();
    assert_setup_ok(&out);
    assert_guest_ping(&out, "GUEST", 3);
    let addrs = ns.ip(&["-o", "-4", "addr", "show", "dev", "ktname"]);
    assert!(
        addrs.contains(&host_cidr) && !addrs.contains("10.200.77.1"),
        "kite changed the existing TAP's addresses: {addrs}"
    );
    assert!(
        ns.links().contains(&"ktname".to_string()),
        "kite deleted a TAP it did not create"
    );
    ns.ip(&["link", "del", "ktname"]);

    // A TAP descriptor handed to kite (as fd 3).
    let tap = open_tap(&ns, "ktfd");
    ns.ip(&["addr", "add", &host_cidr, "dev", "ktfd"]);
    ns.ip(&["link", "set", "ktfd", "up"]);
    let raw = tap.as_raw_fd();
    let vm = NetVm::boot_with(&ns, &dir, &script, 1, &["fd=3".into()], |cmd| {
        pass_fd_as_3(cmd, raw)
    });
    let out = vm.finish();
    assert_setup_ok(&out);
    assert_guest_ping(&out, "GUEST", 3);
    drop(tap);
}

// ---------------------------------------------------------------------------
// 8: bad configurations
// ---------------------------------------------------------------------------

/// Runs `kite --kernel ... --net <net>` in the namespace (stdin /dev/null);
/// returns the output.
fn cli_with_net(ns: &NetNs, net: &str, adjust: impl FnOnce(&mut Command)) -> Output {
    let guest = linux_guest();
    let mut cmd = ns.command(kite_bin());
    cmd.arg("--kernel")
        .arg(&guest.vmlinux)
        .args(["--cmdline", &guest.cmdline, "--memory", "size=256M"])
        .args(["--serial", "null", "--console", "off", "--net", net])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let status = wait_child(&mut child, TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(status.is_some(), "kite --net {net} kept running");
    out
}

#[test]
fn bad_net_configurations_are_refused() {
    let ns = NetNs::new();
    let long = "kite-tap-name-too-long";

    let kite = start_api_in(&ns);
    let disk = kite.dir.path("none.img");
    fs::write(&disk, vec![0u8; 4096]).unwrap();
    let config = api_config(
        &kite.dir.path("serial.txt"),
        &disk,
        json!([{"tap": long, "ip": "10.200.8.1", "mask": "255.255.255.0"}]),
    );
    let (code, body) = kite.api("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(code, 400, "a {}-byte TAP name: {body}", long.len());
    assert!(
        body.contains(long),
        "the error does not name the TAP: {body}"
    );
    assert_eq!(kite.api("GET", "vmm.ping", None).0, 200);
    drop(kite);

    let out = cli_with_net(
        &ns,
        &format!("tap={long},ip=10.200.8.1,mask=255.255.255.0"),
        |_| {},
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kite started with TAP {long}");
    assert!(
        stderr.contains(long),
        "the error does not name the TAP:\n{stderr}"
    );

    // Descriptors that are no TAP: stdin (/dev/null), a regular file (as
    // fd 3), one that is not open.
    let file = fs::File::open(linux_guest().initramfs).unwrap();
    let raw = file.as_raw_fd();
    for (fd, needles) in [
        (0, &["0 is not a TAP"][..]),
        (3, &["TAP file descriptor 3", "not a TAP"][..]),
        (250, &["TAP file descriptor 250", "cannot use it"][..]),
    ] {
        let out = cli_with_net(&ns, &format!("fd={fd}"), |cmd| {
            if fd == 3 {
                pass_fd_as_3(cmd, raw);
            }
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "kite started with fd={fd}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "fd={fd}: the error does not say {needle:?}:\n{stderr}"
            );
        }
    }
    assert_eq!(ns.links(), ["lo"], "interfaces left in the namespace");
}

// ---------------------------------------------------------------------------
// 9: small rings
// ---------------------------------------------------------------------------

#[test]
fn small_rings_carry_segmentation_offload_traffic() {
    // 32-entry queues (the configuration allows 4 to 1024) with the default
    // offloads: the host's TCP hands the TAP segments of up to 64 KiB,
    // which take dozens of the driver's mergeable receive buffers each.
    // Linux refills its receive ring only once more than half of it is
    // free, so a device that waits for more buffers than that for one
    // frame waits forever.
    let ns = NetNs::new();
    let dir = TempDir::new("vn-small");
    let n = 9;
    let size = 4 * MIB;
    let data: Vec<Arc<Vec<u8>>> = (0..2).map(|i| Arc::new(noise(size, 90 + i))).collect();
    let server = serve_each(listen(&ns, 5001), data.clone());
    let sink = receive(listen(&ns, 5002));
    let h = host_ip(n);
    let script = format!(
        r#"{}
for i in 0 1; do
  $B timeout 6 $B nc {h} 5001 > /tmp/r$i
  echo "KITE-RX-$i: $($B wc -c < /tmp/r$i) $($B sha256sum /tmp/r$i | $B cut -d' ' -f1)"
done
$B timeout 6 $B nc {h} 5002 < /tmp/r0
echo "KITE-TX-RC: $?"
"#,
        guest_up(n)
    );
    let vm = NetVm::boot(&ns, &dir, &script, 1, &[net_arg(n, ",queue_size=32")]);
    let out = vm.finish();
    assert_setup_ok(&out);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(
            expect_field(&out, &format!("KITE-RX-{i}: ")),
            format!("{size} {}", sha256(&dir, d)),
            "host to guest transfer {i} over 32-entry rings did not arrive whole (stalled?):\n{out}"
        );
    }
    assert_eq!(expect_field(&out, "KITE-TX-RC: "), "0", "{out}");
    join("host to guest", server);
    let back = join("guest to host", sink);
    assert_same_bytes(&back, &data[0], "guest to host over 32-entry rings");
}

// ---------------------------------------------------------------------------
// 10: two NICs, a guest reboot
// ---------------------------------------------------------------------------

#[test]
fn two_nics_work_again_after_a_guest_reboot() {
    let ns = NetNs::new();
    let dir = TempDir::new("vn-reboot");
    let (a, b) = (10, 11);
    let size = MIB;
    let data = Arc::new(noise(size, 100));
    // The host tells the guest which boot it is in.
    let boots = serve_each(
        listen(&ns, 5100),
        vec![Arc::new(b"1\n".to_vec()), Arc::new(b"2\n".to_vec())],
    );
    let server = serve_each(listen(&ns, 5101), vec![data.clone(), data.clone()]);
    let mut script = guest_up(a);
    script += &guest_up(b).replace("eth0", "eth1");
    script += &format!(
        r#"boot=$($B timeout 10 $B nc {ha} 5100)
echo "KITE-BOOT: $boot"
$B ping -c 3 -i 0.2 -W 5 {ha} > /tmp/ping 2>&1
echo "KITE-PING-A-$boot: $? $($B grep 'packets transmitted' /tmp/ping)"
$B ping -c 3 -i 0.2 -W 5 {hb} > /tmp/ping 2>&1
echo "KITE-PING-B-$boot: $? $($B grep 'packets transmitted' /tmp/ping)"
$B timeout 10 $B nc {hb} 5101 > /tmp/r
echo "KITE-RX-$boot: $($B wc -c < /tmp/r) $($B sha256sum /tmp/r | $B cut -d' ' -f1)"
echo "KITE-QUEUES-$boot: $($B ls /sys/class/net/eth0/queues | $B tr '\n' ' ')"
if [ "$boot" = 1 ]; then echo KITE-REBOOTING; $B stty onlcr; $B reboot -f; fi
"#,
        ha = host_ip(a),
        hb = host_ip(b)
    );
    let vm = NetVm::boot(
        &ns,
        &dir,
        &script,
        2,
        &[
            format!("tap=kt0,ip={},mask=255.255.255.0,num_queues=4", host_ip(a)),
            format!(
                "tap=kt1,ip={},mask=255.255.255.0,mac=02:00:00:00:0b:02",
                host_ip(b)
            ),
        ],
    );
    let out = vm.finish();
    assert_setup_ok(&out);
    assert_eq!(count_lines(&out, "KITE-GUEST-UP"), 2, "{out}");
    assert_eq!(count_lines(&out, "KITE-REBOOTING"), 1, "{out}");
    let boot_lines: Vec<&str> = lines(&out)
        .into_iter()
        .filter_map(|l| l.strip_prefix("KITE-BOOT: "))
        .collect();
    assert_eq!(boot_lines, ["1", "2"], "{out}");
    // Both boots see the same NICs in the same order, the random MAC kept.
    let nics: Vec<&str> = lines(&out)
        .into_iter()
        .filter(|l| l.starts_with("KITE-NET: eth"))
        .collect();
    assert_eq!(nics.len(), 4, "{out}");
    assert_eq!(nics[0], nics[2], "eth0 changed across the reboot:\n{out}");
    assert_eq!(nics[1], "KITE-NET: eth1 02:00:00:00:0b:02", "{out}");
    assert_eq!(nics[3], nics[1], "{out}");
    let sha = sha256(&dir, &data);
    for boot in 1..=2 {
        assert_guest_ping(&out, &format!("A-{boot}"), 3);
        assert_guest_ping(&out, &format!("B-{boot}"), 3);
        assert_eq!(
            expect_field(&out, &format!("KITE-RX-{boot}: ")),
            format!("{size} {sha}"),
            "boot {boot}:\n{out}"
        );
        assert_eq!(
            expect_field(&out, &format!("KITE-QUEUES-{boot}: ")),
            "rx-0 rx-1 tx-0 tx-1 ",
            "boot {boot}:\n{out}"
        );
    }
    join("boot numbers", boots);
    join("host to guest", server);
}
